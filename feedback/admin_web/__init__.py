"""``ghostloop admin serve``: the dashboard, server-rendered (Starlette and Jinja2)."""
