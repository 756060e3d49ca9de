# The hangwatch image: one static binary and nothing else (no shell, no libc, no package
# manager). Build it with scripts/build-image.sh, which builds the static binary first:
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
FROM scratch
COPY target/x86_64-unknown-linux-gnu/release/hangwatch /hangwatch
ENTRYPOINT ["/hangwatch"]
CMD ["run", "--config", "/etc/hangwatch/config.yaml"]
