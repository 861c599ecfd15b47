# Prometheus from Debian 12's `prometheus` package, for the compose stack.
#
# scripts/build-images puts the package's /usr/bin/prometheus next to this file (apt-get download
# prometheus; dpkg-deb -x) and builds on its own Debian 12 root. Elsewhere, any Debian 12 base works,
# e.g. --build-arg BASE=debian:bookworm-slim with the binary taken from the same package.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

COPY prometheus /usr/bin/prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus

EXPOSE 9090
USER 65534:65534
WORKDIR /prometheus
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/ready HTTP/1.0\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]

ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=0.0.0.0:9090"]
