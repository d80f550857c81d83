# simq-indexer: publishes manifests and centroids, flips the pointer (CAS), holds the
# rollout lock (a session), manages API key records; reads health for status.
key_prefix "simq/" {
  policy = "write"
}
session_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
