"""Clinical reasoning for CMV antiviral orders: facts, dosing tables, rules and cards (no HTTP)."""
