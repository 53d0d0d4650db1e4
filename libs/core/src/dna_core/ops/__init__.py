"""Operational helpers shared by every service: node keys and the service CLI skeleton."""
