# The hangwatch images: one static binary each and nothing else (no shell, no libc, no package
# manager). Build them with scripts/build-image.sh, which builds the static binaries first:
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu
# The cordoner has its own target (`--target cordoner`): the node DaemonSet's image does not
# carry the Kubernetes client. The last stage, the DaemonSet's, is the default.
FROM scratch AS cordoner
COPY target/x86_64-unknown-linux-gnu/release/hangwatch-cordoner /hangwatch-cordoner
ENTRYPOINT ["/hangwatch-cordoner"]

FROM scratch AS hangwatch
COPY target/x86_64-unknown-linux-gnu/release/hangwatch /hangwatch
ENTRYPOINT ["/hangwatch"]
CMD ["run", "--config", "/etc/hangwatch/config.yaml"]
