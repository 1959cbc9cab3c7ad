# syntax=docker/dockerfile:1.7
# Multi-stage build of the three binaries. Dependencies are cached twice over: the registry
# and the target directory live in BuildKit cache mounts, so a source change rebuilds only
# the workspace crates.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aichat-api -p aichat-worker -p aichat-fake-llm \
    && mkdir -p /out \
    && cp target/release/aichat-api target/release/aichat-worker target/release/aichat-fake-llm /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 aichat
COPY --from=build /out/ /usr/local/bin/
USER aichat
EXPOSE 8000 9100 8088
CMD ["aichat-api"]
