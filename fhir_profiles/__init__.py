"""FHIR conformance resources (ValueSets, profiles, PlanDefinition) as JSON, loaded by the code."""
