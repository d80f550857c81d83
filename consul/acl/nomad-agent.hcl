# The Nomad agent: registers its own services and simq's (shards, embedders, balancers,
# blob store) with their checks, and deregisters them. As documented for Nomad clients.
agent_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
}
