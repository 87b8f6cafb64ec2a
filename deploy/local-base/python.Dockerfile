# Local stand-in for `python:3.12-slim-bookworm` (see debian.Dockerfile for why): the
# local `debian:bookworm-slim` plus a CPython 3.12 in /usr/local, as the official image
# lays it out. The interpreter is the build host's own 3.12 (copied by
# scripts/compose-base-images.sh into its context, without the test suite); it was built
# on Debian bookworm, so it links against the same libraries installed here.
FROM debian:bookworm-slim
LABEL org.thor.local-base="python:3.12-slim-bookworm"

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      netbase tzdata libbz2-1.0 libexpat1 libffi8 libgdbm6 liblzma5 libncursesw6 \
      libreadline8 libsqlite3-0 libssl3 libuuid1 zlib1g \
 && rm -rf /var/lib/apt/lists/*
COPY . /usr/local/
# The copied scripts name the host's interpreter in their #! lines: point them here.
RUN ldconfig \
 && for f in /usr/local/bin/*; do \
      if [ -f "$f" ] && [ ! -L "$f" ] && head -n1 "$f" | grep -q '^#!/.*/python3\.12$'; then \
        sed -i '1s|^#!.*|#!/usr/local/bin/python3.12|' "$f"; \
      fi; \
    done \
 && python3 -c "import ssl, sqlite3, ctypes, lzma, bz2, zlib, sys; assert sys.version_info[:2] == (3, 12), sys.version" \
 && pip --version
ENV PATH=/usr/local/bin:${PATH}
CMD ["python3"]
