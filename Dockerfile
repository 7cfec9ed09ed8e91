# Multi-stage build: cargo-chef caches the dependency layer, the runtime is debian-slim with the binary and models.
FROM rust:1.95-bookworm AS chef
RUN cargo install cargo-chef --locked
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin deepgrow-server

FROM debian:bookworm-slim AS runtime
RUN useradd --system --uid 10001 deepgrow
WORKDIR /srv/deepgrow
COPY --from=builder /app/target/release/deepgrow-server /usr/local/bin/deepgrow-server
COPY models ./models
USER deepgrow
ENV DEEPGROW_HOST=0.0.0.0 \
    DEEPGROW_PORT=5000 \
    DEEPGROW_MODELS_DIR=/srv/deepgrow/models
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/deepgrow-server"]
