"""Node agent: one long-lived process per cluster node.

Nothing here imports ``flow_nexus_server``: a node runs from a container image or another
host holding only this package and its dependencies.
"""
