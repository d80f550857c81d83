# The Consul agent's own token: registers its node and syncs the services on it.
node_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
