"""CDS Hooks protocol layer: HTTP, validation, auth, prefetch, FHIR fetching, feedback."""
