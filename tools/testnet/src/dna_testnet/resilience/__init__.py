"""The resilience suite (issue 13, point 6): scenarios of faults on a running network, a
write load with per-message IDs, and a history checker that says whether anything
acknowledged was lost or delivered twice. docs/resilience.md tells how to run it.

checker    the Jepsen "set-full" style history checker (pure)
scenarios  the six scenarios, declared once for compose and for Kubernetes (deploy/chaos)
driver     the cluster drivers: kill, wipe, restart, pause, partition, loss (compose, kubectl)
agent      the script the peers' containers run: paced sends, replica sets, holdings
runner     one scenario: load, faults on their timeline, reads, the checker's figures
"""
