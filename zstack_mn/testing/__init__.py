"""Test and benchmark support shipped with the package: real-server helpers (isolated vhost,
database, queue prefix) and a harness that runs real ``zstack-mn`` processes."""
