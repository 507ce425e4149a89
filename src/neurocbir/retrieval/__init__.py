"""Retrieval: the vector index and case stores (FAISS, Milvus), the SQLite case archive and
what fills it (folders of scans, a PACS over DICOMweb)."""
