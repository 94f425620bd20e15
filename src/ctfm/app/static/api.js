// Renders /openapi.json as a page (bundled: no scripts from the network).
"use strict";

function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }

function resolve(spec, schema) {
  while (schema && schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
  return schema || {};
}

function typeOf(spec, schema) {
  schema = resolve(spec, schema);
  if (schema.enum) return schema.enum.map(v => JSON.stringify(v)).join(" | ");
  if (schema.anyOf) return schema.anyOf.map(s => typeOf(spec, s)).join(" | ");
  if (schema.type === "array") return `array of ${typeOf(spec, schema.items)}`;
  if (schema.title && schema.properties) return schema.title;
  return schema.type || "any";
}

function schemaTable(spec, schema) {
  schema = resolve(spec, schema);
  const table = el("table");
  table.append(Object.assign(el("tr"), { innerHTML: "<th>field</th><th>type</th><th>required</th><th>meaning</th>" }));
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const tr = el("tr");
    const p = resolve(spec, prop);
    tr.append(el("td", name), el("td", typeOf(spec, prop)), el("td", (schema.required || []).includes(name) ? "yes" : "no"), el("td", p.description || prop.description || ""));
    table.append(tr);
  }
  return table;
}

async function start() {
  const spec = await (await fetch("/openapi.json")).json();
  document.getElementById("title").textContent = `${spec.info.title} ${spec.info.version}: API`;
  document.getElementById("description").textContent = spec.info.description || "";
  const holder = document.getElementById("endpoints");
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const box = el("div", undefined, "endpoint");
      const head = el("h2");
      head.append(el("span", method.toUpperCase(), "method"), el("code", path));
      box.append(head, el("p", op.summary || ""));
      if (op.parameters && op.parameters.length) {
        const table = el("table");
        table.append(Object.assign(el("tr"), { innerHTML: "<th>parameter</th><th>in</th><th>type</th><th>required</th><th>meaning</th>" }));
        for (const p of op.parameters) {
          const tr = el("tr");
          tr.append(el("td", p.name), el("td", p.in), el("td", typeOf(spec, p.schema)), el("td", p.required ? "yes" : "no"), el("td", p.description || (p.schema && p.schema.description) || ""));
          table.append(tr);
        }
        box.append(table);
      }
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        const [type, media] = Object.entries(body)[0];
        box.append(el("p", `request body (${type}):`), schemaTable(spec, media.schema));
      }
      for (const [code, response] of Object.entries(op.responses || {})) {
        if (code === "422") continue;
        const types = Object.keys(response.content || {});
        box.append(el("p", `${code}: ${response.description}${types.length ? ` (${types.join(", ")})` : ""}`));
        const media = (response.content || {})["application/json"];
        if (media && media.schema && resolve(spec, media.schema).properties) box.append(schemaTable(spec, media.schema));
      }
      holder.append(box);
    }
  }
}

start();
