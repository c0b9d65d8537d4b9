"""Network plumbing both ends share: operator addresses, the TLS policy, TLS over trio streams."""
