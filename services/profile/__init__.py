"""Profile: the Unified Customer and Account Profiles, their history and aggregates."""
