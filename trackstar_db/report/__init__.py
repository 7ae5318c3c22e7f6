"""The HTML report and explorer pages over every stage (analysis.py assembles them; page.py is the
one page shell, stylesheet and escaping they share)."""
