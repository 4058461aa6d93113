"""Models that arrive as something other than a Hugging Face directory: GGUF files and Ollama
models, imported into plain Hugging Face directories.

- `ollama_store`: `ollama:NAME[:TAG]` references and Ollama's local store (manifests, blobs);
- `gguf_file`: checking a GGUF file (complete, an architecture we import, a tokenizer) without
  loading it;
- `templates`: Ollama's Go chat templates mapped back to our Jinja ones, Ollama's parameters
  mapped to a generation config;
- `convert`: the GGUF loaded through `transformers` and written as a Hugging Face directory;
- `importer`: `import_model` (`largeforge import`) and `resolve_source`, the content-addressed
  cache that `largeforge.runs.resolve_model_dir` uses so that every `--model` takes a GGUF file
  or an Ollama model.

Only `importer` and `convert` need torch, and they import it only when a model is imported.
"""
