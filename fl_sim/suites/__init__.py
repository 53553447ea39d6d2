"""Task suites: the suite interface, the built-in suites (toy, digits, text, local, shared-head) and
their data and models.
"""
