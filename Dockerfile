# CLIP-Scope Explorer: one image for the precompute job (GPU) and the web server.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    CLIPSCOPE_CACHE=/cache/clipscope \
    CLIPSCOPE_SEARCH_CACHE=/cache/clipscope/search

WORKDIR /opt/clipscope
COPY pyproject.toml README.md constraints.txt ./
COPY clipscope_explorer ./clipscope_explorer
COPY app ./app
COPY precompute ./precompute
COPY templates ./templates
COPY static ./static
COPY docs ./docs
# A regular install: templates and static files are package data.
RUN pip install '.[distributed]' -c constraints.txt

EXPOSE 8000
ENTRYPOINT ["clipscope-explorer"]
CMD ["demo", "--host", "0.0.0.0", "--data", "/data/demo"]
