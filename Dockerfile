# syntax=docker/dockerfile:1
# Images for the docker-compose demo (docker-compose.yml):
#   --target onboardd      the daemon (package onboardd), exactly as it ships
#                          to gateways
#   --target fake-qubitro  the fake Qubitro API (workspace crate fake-qubitro/)
#   --target sensor        the reference sensor (examples/sensor.rs)
# All from one builder stage so the dependency build is shared.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between image builds; the
# binaries are copied out because the cache is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p fake-qubitro --bin fake-qubitro \
    && cargo build --release --locked -p onboardd --bin onboardd \
    && cargo build --release --locked -p onboardd --example sensor \
    && mkdir -p /out \
    && cp target/release/onboardd target/release/fake-qubitro target/release/examples/sensor /out/

FROM debian:bookworm-slim AS runtime-base
# CA roots for a real Qubitro endpoint over TLS (the demo's fake cloud is plain HTTP).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS fake-qubitro
COPY --from=build /out/fake-qubitro /usr/local/bin/fake-qubitro
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/fake-qubitro"]

FROM runtime-base AS sensor
COPY --from=build /out/sensor /usr/local/bin/sensor
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/sensor"]

FROM runtime-base AS onboardd
COPY --from=build /out/onboardd /usr/bin/onboardd
COPY config/onboardd.toml /etc/onboardd/onboardd.toml
# The same directories the systemd unit gives it (StateDirectory=,
# RuntimeDirectory=), owned by an unprivileged user. The volume is the state
# directory (store.path): sled in db/, the generated claim key beside it. A
# corrupt database is moved aside to db.corrupt-<secs> inside it, a rename that
# works where the volume's mount point itself cannot be renamed.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin onboardd \
    && install -d -m 0700 -o onboardd -g onboardd /var/lib/onboardd /run/onboardd
USER onboardd
VOLUME /var/lib/onboardd
ENTRYPOINT ["/usr/bin/onboardd"]
CMD ["run", "--config", "/etc/onboardd/onboardd.toml"]
