FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY listenerpool ./listenerpool
COPY workers ./workers
COPY gateway ./gateway
RUN pip install --no-cache-dir .
# Services choose their role by command: listenerpool gateway | worker | upstream-demo
ENTRYPOINT []
CMD ["listenerpool", "--help"]
