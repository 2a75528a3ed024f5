# CPU image by default; for CUDA build with --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
# (the pinned torch wheel carries its own CUDA libraries) and run with --gpus all.
ARG BASE=python:3.11-slim
FROM ${BASE}
ENV PYTHONUNBUFFERED=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    HF_HUB_OFFLINE=1
RUN (command -v python3 >/dev/null || (apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv)) \
    && useradd --create-home --uid 1000 app
WORKDIR /home/app/workbench
COPY requirements.txt .
RUN python3 -m pip install --no-cache-dir -r requirements.txt
COPY --chown=app:app . .
USER app
EXPOSE 7860
CMD ["python3", "app.py"]
