"""This node's kernel plumbing (pyroute2): namespaces, veth, vxlan, addresses, routes, host ports."""
