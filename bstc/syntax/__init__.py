"""Front ends: the `.bst` DSL (lark) and YAML, both producing bstc.syntax.ast.ModelDef."""
