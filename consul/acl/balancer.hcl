# simq-balancer: follows the active pointer, manifests, centroids and API key records,
# and the health of shards and embedders. Reads only.
key_prefix "simq/" {
  policy = "read"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
