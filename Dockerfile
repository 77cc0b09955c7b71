FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY zstack_mn ./zstack_mn
RUN pip install --no-cache-dir .
ENV ZSTACK_MN_HTTP_HOST=0.0.0.0 ZSTACK_MN_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["zstack-mn"]
CMD ["start"]
