# The operator image: `docker build -t tenancy-operator .` (the chart's image.repository/tag).
# Slim Debian Python, the PostgreSQL client tools the operator runs (pg_dump and pg_restore for
# archives), no compiler, non-root, and nothing written outside /tmp and the archive volume, so the
# chart can keep the root filesystem read-only.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY operator ./operator
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# pg_dump refuses a server of a newer major, and pg_restore 17 and later fail on 15 and 16 (they
# set transaction_timeout). For each database target the operator runs the client tools of its
# server's major if installed (/usr/lib/postgresql/<major>/bin), else the nearest newer. trixie's
# postgresql-client is 17; for other majors add the PGDG repository and pass the packages (one or
# more), e.g. --build-arg POSTGRES_CLIENT_PACKAGE="postgresql-client-15 postgresql-client-18".
ARG POSTGRES_CLIENT_PACKAGE=postgresql-client
# Unquoted on purpose: the argument may name several packages.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ${POSTGRES_CLIENT_PACKAGE} ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tenancy \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin tenancy \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/tenancy/archive
COPY --from=build /wheels /wheels
# Byte-compiled at install time: with a read-only root filesystem Python could not write .pyc later.
# The operator runs with -OO (ENTRYPOINT), which reads .opt-2.pyc files: importing it once with
# -OO writes them for every module it loads, the standard library's included.
RUN python -m pip install --no-cache-dir --no-index --find-links=/wheels tenancy-operator \
    && rm -rf /wheels \
    && python -OO -c "import tenancy_operator.runtime"
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TENANCY_ARCHIVE_DIR=/var/lib/tenancy/archive
USER 10001:10001
EXPOSE 8080 8081
# -OO: no docstrings and no asserts in memory, about 18 MB less per replica.
ENTRYPOINT ["python", "-OO", "-m", "tenancy_operator", "run"]
