"""Test and benchmark support shipped with the package: services on fakes for unit tests of
their handlers (``services``), real-server helpers (isolated vhost, database, queue prefix:
``servers``), a harness that runs real ``zstack-mn`` processes (``cluster``), and the fault
matrix with its load, history and checker (``faults``)."""
