"""Fabric provisioning for the gateway and backend hosts (tasks stay thin; logic lives in the packages)."""
