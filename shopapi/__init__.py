"""The shops' REST API v2: the client, webhook registration, and the sync of customers."""
