# pgcloak: the proxy, the admin endpoints and the sidecar injector in one image.
#   docker build -t pgcloak .
#   docker run -p 6432:6432 -e PGCLOAK_MASTER_KEY=... -v $PWD/policy.yaml:/etc/pgcloak/policy/policy.yaml:ro \
#     pgcloak run --listen 0.0.0.0:6432 --backend postgresql://db:5432 --policy /etc/pgcloak/policy/policy.yaml
FROM python:3.11-slim AS build
# The audit trail's C parts (setup.py): a compiler and OpenSSL's headers, build stage only.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# A fixed non-root uid: the injected sidecar runs as 65532 with a read-only root
# filesystem; the audit trail and spill file go to /var/lib/pgcloak (a volume).
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin pgcloak \
    && mkdir -p /var/lib/pgcloak /etc/pgcloak/policy \
    && chown 65532 /var/lib/pgcloak
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 65532
WORKDIR /var/lib/pgcloak
EXPOSE 6432 9187
ENTRYPOINT ["pgcloak"]
CMD ["run", "--listen", "0.0.0.0:6432", "--admin-listen", "0.0.0.0:9187"]
