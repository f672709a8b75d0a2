"""Speech to text (Whisper via faster-whisper): the transcriber, its batching service and `inferd transcribe`."""
