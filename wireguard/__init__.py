"""WireGuard tunnel between gateway and backend: keys, wg-quick configs, bring-up, status, egress rules."""
