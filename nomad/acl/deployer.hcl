# simq-deployer: what scripts/deploy.sh and simq-indexer (rollout, rollback, abort,
# status) need from Nomad, and nothing else: the jobs of the "simq" namespace only. It
# can register, read and promote or fail deployments of simq's jobs and read their task
# logs (rollout failure causes); it cannot touch a job of another namespace, read nodes,
# exec into allocations or manage ACLs.
namespace "simq" {
  capabilities = ["list-jobs", "parse-job", "read-job", "submit-job", "read-logs"]
}
