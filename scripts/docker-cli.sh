# Sourced by the scripts that drive Docker: sets DOCKER (the client) and COMPOSE (compose).
# The client Debian's docker.io installs comes first: it has BuildKit's --secret, which a
# newer client without the buildx plugin lacks. DOCKER=... and COMPOSE=... override.
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
if [ -z "${COMPOSE:-}" ]; then
  if command -v docker-compose >/dev/null 2>&1; then COMPOSE=docker-compose; else COMPOSE="$DOCKER compose"; fi
fi
export DOCKER COMPOSE DOCKER_BUILDKIT=1
