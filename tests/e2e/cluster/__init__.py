"""Multi-runner end-to-end tests (issue 18): three runners in network namespaces,
two gateways, PostgreSQL, a TCP balancer, all driven through the real client."""
