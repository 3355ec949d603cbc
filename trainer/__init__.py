"""Preference training: pairs, DPO / RRHF / SFT, the evaluation gate, publishing (issue 14)."""
