"""The OpenAI-compatible server behind `llmrun serve`: request bodies (protocol), one request in
flight (generation), what the server holds (state), its metrics, and the routes (app)."""
