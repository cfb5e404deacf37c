FROM python:3.11-slim
WORKDIR /app
# The pinned versions CI tested (requirements/compile regenerates them), not whatever is newest.
COPY requirements/runtime.txt ./requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY listenerpool ./listenerpool
COPY workers ./workers
COPY gateway ./gateway
RUN pip install --no-cache-dir -c requirements/runtime.txt . \
    && useradd --system --no-create-home --uid 10001 listenerpool
# Nothing the services do needs root: they listen on unprivileged ports and write no files.
USER listenerpool
# Services choose their role by command: listenerpool gateway | worker | upstream-demo
ENTRYPOINT []
CMD ["listenerpool", "--help"]
