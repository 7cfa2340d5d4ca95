# syntax=docker/dockerfile:1
# Fusion Gateway, CPU image: multi-stage build, slim non-root runtime.
#   docker build -t fusion-gateway .
#   docker run -p 8080:8080 fusion-gateway            # serves the demo pool
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config=1.8.* \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin fusion \
 && install -D -m 0755 target/release/fusion /out/fusion

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=2023* tini=0.19.* \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 fusion \
 && useradd --uid 10001 --gid fusion --home-dir /var/lib/fusion --create-home --shell /usr/sbin/nologin fusion
COPY --from=build /out/fusion /usr/local/bin/fusion
ENV FUSION_DEMO_DIR=/var/lib/fusion/demo \
    FUSION_DATA_DIR=/var/lib/fusion \
    FUSION_SERVER__BIND=0.0.0.0:8080
USER 10001:10001
WORKDIR /var/lib/fusion
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/fusion"]
CMD ["serve"]
