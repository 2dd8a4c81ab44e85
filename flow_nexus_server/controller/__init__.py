"""The controller: one long-lived process per state home that owns clusters, nodes and
sessions; ``flow-nexus-server`` (stdio or HTTP) is a front-end that talks to it."""
