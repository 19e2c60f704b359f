// The JavaScript context of the sandbox tier: Node.js, started by the agent at the first
// `%%tier sandbox --lang js|ts` cell (see js_node.py, which hands this program to `node -e`).
//
// One context for all of a kernel's JS and TS cells. Each cell is rewritten (with acorn) so
// that what it declares at its top level is kept for the next cell and may be declared again
// when the cell runs again, as in a REPL; its top level may `await`; its last expression's
// value is its result. A TS cell has its types stripped by TypeScript first, and its errors
// say its own line numbers (through the source map).
//
// Requests come on the fd TIERKERNEL_JS_FDS names first, messages go on the second, one JSON
// object a line:
//   agent -> node: {type: "run", cell, code, lang} | {type: "answer", seq, response}
//   node -> agent: {type: "stream", cell, name, text} | {type: "display"|"result", cell,
//                  json|text} | {type: "helper", cell, seq, request, wait} |
//                  {type: "error", cell, name, message, stack} | {type: "done", cell, ok}
// Nothing is sent between cells: output of a timer left running goes to the process's own
// stdout and stderr, which the agent forwards as it does for a Python cell's background work.
//
// All of it is inside one function: `node -e` runs its program in the global scope, where
// the cells' declarations land too, and a cell must reach nothing of the driver's but what
// it is given on globalThis.
(() => {
"use strict";

const fs = require("fs");
const path = require("path");
const util = require("util");
const vm = require("vm");

const { AsyncLocalStorage } = require("async_hooks");
const [REQUESTS, MESSAGES] = (process.env.TIERKERNEL_JS_FDS || "3,4").split(",").map(Number);
delete process.env.TIERKERNEL_JS_FDS;
const WORKSPACE = process.cwd();
const CELL = "<cell>";

let running = null; // {cell, interrupt: reject function} while a cell runs
// The cell whose code started the work that is running: a timer or promise an earlier cell
// left carries that cell's number, and its helper calls are refused as an earlier cell's.
const origin = new AsyncLocalStorage();
let seq = 0;
const answers = new Map(); // helper seq -> resolve
const ENDED = new WeakSet(); // the errors of helper calls a cell left waiting when it ended

function send(msg) {
  const data = Buffer.from(JSON.stringify(msg) + "\n");
  let at = 0;
  while (at < data.length) {
    try {
      at += fs.writeSync(MESSAGES, data, at);
    } catch (error) {
      if (error.code !== "EAGAIN") throw error;
    }
  }
}

// -- what a cell sees ----------------------------------------------------------------------
// As the wasm tier prints: strings as they are, the rest as JSON where JSON can say it.
function text(args) {
  return args.map((value) => {
    if (typeof value === "string") return value;
    try {
      const json = JSON.stringify(value);
      return json === undefined ? String(value) : json;
    } catch (error) {
      return String(value);
    }
  }).join(" ");
}

function helper(name, args, wait = true) {
  if (running === null) {
    const error = new Error(`${name}() can only be called while a cell runs`);
    error.name = "PermissionError";
    return wait ? Promise.reject(error) : undefined;
  }
  seq += 1;
  const request = { type: "helper", cell: running.cell, origin: origin.getStore() ?? null, seq,
                    request: { helper: name, args }, wait };
  if (!wait) {
    send(request);
    return undefined;
  }
  return new Promise((resolve, reject) => {
    answers.set(seq, (response, ended = false) => {
      if (response && response.ok) return resolve(response.value);
      const failure = (response && response.error) || {};
      const error = new Error(String(failure.message || `${name}() failed`));
      error.name = String(failure.type || "Error");
      if (ended) ENDED.add(error);
      reject(error);
    });
    send(request);
  });
}

function level(name, stream) {
  return (...args) => {
    const line = text(args);
    if (running === null) {
      (stream === "stderr" ? process.stderr : process.stdout).write(line + "\n");
      return;
    }
    send({ type: "stream", cell: running.cell, name: stream, text: line + "\n" });
    helper("console", { level: name, message: line }, false);
  };
}

// A value as the notebook shows it: JSON for what JSON says exactly, else Node's inspection.
function shown(value) {
  const plain = value === null || ["string", "number", "boolean"].includes(typeof value)
    || Array.isArray(value) || Object.getPrototypeOf(value) === Object.prototype;
  if (plain) {
    try {
      const json = JSON.stringify(value);
      if (json !== undefined) return { json };
    } catch (error) { /* a cycle or a BigInt: inspected below */ }
  }
  return { text: util.inspect(value, { depth: 4, breakLength: 100 }) };
}

function inWorkspace(file) {
  const name = String(file);
  const full = name === WORKSPACE || name.startsWith(WORKSPACE + "/") ? path.normalize(name)
    : path.join(WORKSPACE, name.replace(/^\/+/, ""));
  if (full !== WORKSPACE && !full.startsWith(WORKSPACE + "/")) {
    const error = new Error(`${name} is outside the workspace`);
    error.code = "EACCES";
    throw error;
  }
  return full;
}

const FILE_ERRORS = { ENOENT: "No such file or directory", EISDIR: "Is a directory",
                      ENOTDIR: "Not a directory", EEXIST: "File exists",
                      EACCES: "Permission denied", ENOTEMPTY: "Directory not empty",
                      ENOSPC: "No space left on device (the workspace is full)" };

// Each call's failure as the wasm tier's: an Error with the code, saying what and which file.
function fileCall(call) {
  return (file, ...rest) => {
    try {
      return call(file, ...rest);
    } catch (error) {
      if (!error || !error.code || error.message.endsWith("is outside the workspace")) throw error;
      const failure = new Error(`${FILE_ERRORS[error.code] || error.code}: '${file}'`);
      failure.code = error.code;
      throw failure;
    }
  };
}

// The fsx workspace, as in the wasm tier: the same calls, the same answers.
const files = {
  readFile: (file, encoding = "utf8") => {
    const data = fs.readFileSync(inWorkspace(file));
    return encoding ? data.toString(encoding) : Array.from(data);
  },
  writeFile: (file, data) => { fs.writeFileSync(inWorkspace(file), String(data)); },
  readdir: (folder = ".") => fs.readdirSync(inWorkspace(folder)).sort(),
  stat: (file) => {
    const info = fs.statSync(inWorkspace(file));
    return { size: info.size, isDirectory: info.isDirectory(), mtime: info.mtimeMs / 1000 };
  },
  mkdir: (folder, options = {}) => {
    fs.mkdirSync(inWorkspace(folder), { recursive: !!options.recursive });
  },
  rm: (file, options = {}) => { fs.rmSync(inWorkspace(file), { recursive: !!options.recursive }); },
};
for (const name of Object.keys(files)) files[name] = fileCall(files[name]);

Object.assign(globalThis, {
  console: { log: level("log", "stdout"), info: level("info", "stdout"),
             warn: level("warn", "stderr"), error: level("error", "stderr"),
             debug: level("log", "stdout") },
  display: (value) => {
    if (running === null) return;
    send({ type: "display", cell: running.cell, ...shown(value ?? null) });
  },
  ai: async (model, input) => helper("ai", { model, input }),
  api: async (url, options = {}) => helper("api", { url, ...options }),
  db: async (query, params = null) => helper("db", { query, params }),
  fs: files,
  exports: {},
});

// -- a cell's code made runnable -----------------------------------------------------------
let acorn = null;
let typescript = null;

class CellSyntaxError extends Error {
  constructor(message, line, column) {
    super(message);
    this.name = "SyntaxError";
    this.line = line;
    this.column = column;
  }
}

// TypeScript to JavaScript, and which TS line each JS line came from.
function stripTypes(code) {
  typescript = typescript || require("typescript");
  const ts = typescript;
  const out = ts.transpileModule(code, {
    fileName: "cell.ts",
    reportDiagnostics: true,
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.CommonJS,
                       sourceMap: true, useDefineForClassFields: true, esModuleInterop: true },
  });
  // Not errors here: a `return` outside a function (1108) and a top-level `await` (1375,
  // 1378) are what a cell may do.
  const allowed = new Set([1108, 1375, 1378]);
  const problem = (out.diagnostics || []).find((d) => d.category === ts.DiagnosticCategory.Error
                                                     && !allowed.has(d.code));
  if (problem) {
    const where = problem.file && problem.start !== undefined
      ? problem.file.getLineAndCharacterOfPosition(problem.start) : { line: 0, character: 0 };
    throw new CellSyntaxError(ts.flattenDiagnosticMessageText(problem.messageText, " "),
                              where.line + 1, where.character + 1);
  }
  const js = out.outputText.replace(/\n\/\/# sourceMappingURL=.*\s*$/, "\n");
  return { js, lines: sourceLines(JSON.parse(out.sourceMapText).mappings) };
}

// For each generated line (0-based), the source line (0-based) of its first mapping, or null.
function sourceLines(mappings) {
  const digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const lines = [];
  let source = 0;
  for (const generated of mappings.split(";")) {
    let first = null;
    for (const segment of generated.split(",")) {
      const fields = [];
      let value = 0;
      let shift = 0;
      for (const ch of segment) {
        const digit = digits.indexOf(ch);
        value += (digit & 31) << shift;
        if (digit & 32) {
          shift += 5;
        } else {
          fields.push(value & 1 ? -(value >>> 1) : value >>> 1);
          value = 0;
          shift = 0;
        }
      }
      if (fields.length >= 4) {
        source += fields[2];
        if (first === null) first = source;
      }
    }
    lines.push(first);
  }
  return lines;
}

// The wrapper's own name for what keeps a cell's functions (no cell's name, in practice).
const KEEP = "__tierkernel_keep_functions";

function names(pattern, into) {
  if (!pattern) return;
  switch (pattern.type) {
    case "Identifier": into.add(pattern.name); break;
    case "ObjectPattern":
      for (const property of pattern.properties) {
        names(property.type === "RestElement" ? property.argument : property.value, into);
      }
      break;
    case "ArrayPattern": for (const element of pattern.elements) names(element, into); break;
    case "RestElement": names(pattern.argument, into); break;
    case "AssignmentPattern": names(pattern.left, into); break;
    default: break;
  }
}

// The cell as one async function whose top-level declarations are the context's variables
// (`var`s of the script: kept, and declared again without complaint), returning the value of
// its last expression. Every edit stays on its line, so the cell's line numbers hold.
function rewrite(code) {
  acorn = acorn || require("acorn");
  let tree;
  try {
    tree = acorn.parse(code, { ecmaVersion: "latest", sourceType: "script",
                               allowAwaitOutsideFunction: true, allowHashBang: true,
                               // Code written as a function's body (`return 1 + 1`, as the
                               // HTTP API's origin takes it): the wrapper is that function.
                               allowReturnOutsideFunction: true,
                               locations: true });
  } catch (error) {
    if (!(error instanceof SyntaxError) || !error.loc) throw error;
    throw new CellSyntaxError(error.message.replace(/ \(\d+:\d+\)$/, ""), error.loc.line,
                              error.loc.column + 1);
  }
  const declared = new Set();
  const functions = [];
  const edits = []; // [at, remove, insert]
  for (const node of tree.body) {
    if (node.type === "VariableDeclaration") {
      for (const declaration of node.declarations) {
        names(declaration.id, declared);
        if (!declaration.init && node.kind !== "var") {
          edits.push([declaration.id.end, 0, " = void 0"]);
        }
      }
      edits.push([node.start, node.kind.length, "void ("]);
      edits.push([code[node.end - 1] === ";" ? node.end - 1 : node.end, 0, ")"]);
    } else if (node.type === "FunctionDeclaration") {
      declared.add(node.id.name);
      functions.push(node.id.name);
    } else if (node.type === "ClassDeclaration") {
      declared.add(node.id.name);
      edits.push([node.start, 0, `${node.id.name} = `]);
      edits.push([node.end, 0, ";"]);
    }
  }
  // Function declarations are hoisted in the wrapper, so they are usable before their line
  // there; they become the context's when the cell starts (for what it calls meanwhile) and
  // again when it ends (`f = memo(f)` in the cell is what the next cell sees).
  const keep = functions.map((name) => `globalThis[${JSON.stringify(name)}] = ${name};`)
    .join(" ");
  const last = tree.body[tree.body.length - 1];
  if (keep) {
    const first = tree.body.find((node) => !node.directive); // after "use strict"
    edits.push([first.start, 0,
                `const ${KEEP} = (value) => { ${keep} return value; }; ${keep} `]);
  }
  if (last && last.type === "ExpressionStatement") {
    edits.push([last.start, 0, keep ? `return ${KEEP}(` : "return ("]);
    edits.push([last.expression.end, 0, ")"]);
  } else if (keep) {
    edits.push([code.length, 0, `\n;${KEEP}();`]);
  }
  if (code.startsWith("#!")) edits.push([0, 2, "//"]);
  // From the end; at one place the replacement first, then the insertions, the last pushed
  // first: what is inserted there reads in the order it was pushed, before the replacement.
  const ordered = edits.map((edit, order) => [...edit, order])
    .sort((a, b) => b[0] - a[0] || (b[1] > 0) - (a[1] > 0) || b[3] - a[3]);
  let body = code;
  for (const [at, remove, insert] of ordered) {
    body = body.slice(0, at) + insert + body.slice(at + remove);
  }
  const head = declared.size ? `var ${[...declared].join(", ")}; ` : "";
  return `${head}(async () => {${body}\n})()`;
}

// -- errors --------------------------------------------------------------------------------
// The frames of the cell's own lines (not the wrapper's call after its last line), with the
// lines of a TS cell's source.
function cellStack(error, lines, count) {
  const stack = typeof error?.stack === "string" ? error.stack.split("\n") : [];
  const frames = stack.filter((line) => {
    const at = /^\s+at .*<cell>:(\d+):\d+/.exec(line);
    return at !== null && Number(at[1]) <= count;
  });
  return frames.map((line) => line.replace(/<cell>:(\d+):(\d+)/g, (all, row, column) => {
    const mapped = lines ? lines[Number(row) - 1] : Number(row) - 1;
    return `${CELL}:${mapped === null || mapped === undefined ? row : mapped + 1}:${column}`;
  }));
}

function failure(cell, error, lines, source, count) {
  if (error instanceof CellSyntaxError) {
    const shownLine = (source.split("\n")[error.line - 1] || "").replace(/\t/g, " ");
    send({ type: "error", cell, name: "SyntaxError",
           message: `${error.message} (line ${error.line}, column ${error.column})`,
           stack: [`    at ${CELL}:${error.line}:${error.column}`, `    ${shownLine}`,
                   `    ${" ".repeat(Math.max(0, error.column - 1))}^`] });
    return;
  }
  if (error instanceof Error || (error && typeof error.stack === "string")) {
    send({ type: "error", cell, name: String(error.name || "Error"),
           message: String(error.message ?? ""), stack: cellStack(error, lines, count) });
    return;
  }
  send({ type: "error", cell, name: "Error",
         message: `uncaught ${util.inspect(error, { depth: 2 })}`, stack: [] });
}

// -- cells -----------------------------------------------------------------------------------
async function run(request) {
  const cell = request.cell;
  let lines = null;
  let stopped;
  const interrupted = new Promise((resolve, reject) => { stopped = reject; });
  interrupted.catch(() => {});
  running = { cell, interrupt: () => {
    const error = new Error("interrupted; the JavaScript context is kept");
    error.name = "KeyboardInterrupt";
    stopped(error);
  } };
  let ok = false;
  let code = "";
  try {
    code = String(request.code);
    if (request.lang === "ts") ({ js: code, lines } = stripTypes(code));
    const script = new vm.Script(rewrite(code), { filename: CELL });
    const work = origin.run(cell, () => script.runInThisContext({ breakOnSigint: true }));
    // Stopped, its own end (usually those ended calls) is of no one's interest.
    if (work && typeof work.catch === "function") {
      work.catch((error) => { if (error && typeof error === "object") ENDED.add(error); });
    }
    const value = await Promise.race([work, interrupted]);
    if (value !== undefined && value !== null) send({ type: "result", cell, ...shown(value) });
    ok = true;
  } catch (error) {
    try {
      if (error && error.code === "ERR_SCRIPT_EXECUTION_INTERRUPTED") {
        failure(cell, Object.assign(new Error("interrupted; the JavaScript context is kept"),
                                    { name: "KeyboardInterrupt", stack: "" }), lines);
      } else {
        failure(cell, error, lines, String(request.code), code.split("\n").length);
      }
    } catch (unreadable) { // a thrown value whose name, message or stack throw when read
      send({ type: "error", cell, name: "Error", message: "uncaught value (unreadable)",
             stack: [] });
    }
  } finally {
    running = null;
    for (const [number, answer] of answers) {
      answers.delete(number);
      answer({ ok: false, error: { type: "RuntimeError", message: "the cell ended" } }, true);
    }
  }
  send({ type: "done", cell, ok });
}

process.on("SIGINT", () => { if (running !== null) running.interrupt(); });
// A promise rejected or an exception thrown by work a cell left behind (a timer) is printed,
// as Node's REPL does, and the context lives on.
// Not the calls a stopped cell left waiting: they end with it, and say nothing more.
process.on("unhandledRejection", (reason) => {
  if (ENDED.has(reason)) return;
  process.stderr.write(`Uncaught (in promise) ${util.inspect(reason)}\n`);
});
process.on("uncaughtException", (error) => {
  process.stderr.write(`Uncaught ${util.inspect(error)}\n`);
});

const queue = [];
let busy = false;
async function next() {
  if (busy) return;
  busy = true;
  try {
    while (queue.length) {
      const request = queue.shift();
      try {
        await run(request);
      } catch (error) { // run() reports its own errors; this is the last guard: a done
        send({ type: "done", cell: request.cell, ok: false });
      }
    }
  } finally {
    busy = false;
  }
}

require("readline").createInterface({ input: fs.createReadStream(null, { fd: REQUESTS }) })
  .on("line", (line) => {
    let msg;
    try { msg = JSON.parse(line); } catch (error) { return; }
    if (msg.type === "answer") {
      const answer = answers.get(msg.seq);
      if (answer) { answers.delete(msg.seq); answer(msg.response); }
    } else if (msg.type === "run") {
      queue.push(msg);
      next();
    }
  })
  .on("close", () => process.exit(0));
send({ type: "ready", node: process.version });
})();
