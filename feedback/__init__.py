"""The feedback store: every suggestion's fate, the label rules, admin views (issue 3 on)."""
