"""What the tests (and scripts/soak.py) share; no tests here, and no fixtures (tests/conftest.py).

- ``config``: the shared local servers, the webhook token, a test service's settings and the
  environment that gives a process those settings.
- ``waiting``: ``wait_until``, the polling every test waits with.
- ``processes``: the one spawner of the project's processes, and what tells about a process
  (its children, whether it listens on a port), free ports.
- ``services``: the receiver, a worker and the admin command inside the test's own process, and
  their HTTP endpoints read from outside.
- ``servers``: private RabbitMQ nodes, a private three-node cluster and a private Postgres, for
  the tests that stop, restart or alarm a server.
- ``proxy``: a TCP proxy between a service and a server, switched while traffic flows.
- ``broker`` and ``database``: what the queues and the tables hold.
- ``load``: webhooks as Upgates sends them, and a sender that retries like Upgates.
- ``events`` and ``oracle``: customer events as the property tests draw them, and the one oracle
  of the fold (what the table must hold after a set of delivered events).
- ``upgates``: a stand-in for the Upgates REST API.
"""
