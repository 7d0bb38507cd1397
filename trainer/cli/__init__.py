"""The `finetune` command line: commands, console output, the chat prompt, the client."""
