"""loramux.deploy: running several replicas behind a load balancer that routes by adapter.

The HAProxy configuration (haproxy_config, with the raw-HTTP/2 gRPC health check of grpc_probe), a local
cluster of replicas behind HAProxy for users, tests and benchmarks (cluster, balancer, processes), and the
Kubernetes manifests in deploy/kubernetes/. It may import the service and the client; nothing imports it.
"""
