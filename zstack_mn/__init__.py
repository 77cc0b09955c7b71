"""zstack-mn: a management-node daemon built on ZStack's stateless-services design."""

__version__ = "0.1.0"
