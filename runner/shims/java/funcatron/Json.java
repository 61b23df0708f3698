package funcatron;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** Minimal JSON for Funcs: no third-party jar is needed. */
public final class Json {
    private final String s;
    private int i;

    private Json(String s) { this.s = s; }

    /** Parse JSON text into Map, List, String, Long, Double, Boolean or null. */
    public static Object parse(String text) {
        Json p = new Json(text);
        p.ws();
        Object v = p.value();
        p.ws();
        if (p.i != text.length()) throw p.err("trailing characters");
        return v;
    }

    private IllegalArgumentException err(String why) {
        return new IllegalArgumentException("invalid JSON at offset " + i + ": " + why);
    }

    private void ws() { while (i < s.length() && " \t\r\n".indexOf(s.charAt(i)) >= 0) i++; }

    private Object value() {
        if (i >= s.length()) throw err("unexpected end");
        char c = s.charAt(i);
        switch (c) {
            case '{': {
                i++; Map<String, Object> m = new LinkedHashMap<>(); ws();
                if (peek('}')) { i++; return m; }
                for (;;) {
                    ws(); if (!peek('"')) throw err("expected a key");
                    String k = string(); ws(); expect(':'); ws();
                    m.put(k, value()); ws();
                    if (peek(',')) { i++; continue; }
                    expect('}'); return m;
                }
            }
            case '[': {
                i++; List<Object> l = new ArrayList<>(); ws();
                if (peek(']')) { i++; return l; }
                for (;;) {
                    ws(); l.add(value()); ws();
                    if (peek(',')) { i++; continue; }
                    expect(']'); return l;
                }
            }
            case '"': return string();
            case 't': word("true"); return Boolean.TRUE;
            case 'f': word("false"); return Boolean.FALSE;
            case 'n': word("null"); return null;
            default: return number();
        }
    }

    private boolean peek(char c) { return i < s.length() && s.charAt(i) == c; }

    private void expect(char c) { if (!peek(c)) throw err("expected '" + c + "'"); i++; }

    private void word(String w) { if (!s.startsWith(w, i)) throw err("expected " + w); i += w.length(); }

    private Object number() {
        int start = i;
        while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) i++;
        String n = s.substring(start, i);
        if (n.isEmpty()) throw err("unexpected character");
        try {
            if (n.contains(".") || n.contains("e") || n.contains("E")) return Double.parseDouble(n);
            return Long.parseLong(n);
        } catch (NumberFormatException e) {
            throw err("bad number " + n);
        }
    }

    private String string() {
        i++;
        StringBuilder b = new StringBuilder();
        while (i < s.length()) {
            char c = s.charAt(i++);
            if (c == '"') return b.toString();
            if (c != '\\') { b.append(c); continue; }
            if (i >= s.length()) break;
            char e = s.charAt(i++);
            switch (e) {
                case 'n': b.append('\n'); break;
                case 't': b.append('\t'); break;
                case 'r': b.append('\r'); break;
                case 'b': b.append('\b'); break;
                case 'f': b.append('\f'); break;
                case 'u':
                    if (i + 4 > s.length()) throw err("bad \\u escape");
                    b.append((char) Integer.parseInt(s.substring(i, i + 4), 16)); i += 4; break;
                default: b.append(e);
            }
        }
        throw err("unterminated string");
    }

    /** Encode Map, Iterable, array, String, Number, Boolean or null as JSON. */
    public static String encode(Object v) {
        StringBuilder b = new StringBuilder();
        write(b, v);
        return b.toString();
    }

    private static void write(StringBuilder b, Object v) {
        if (v == null) b.append("null");
        else if (v instanceof String) quote(b, (String) v);
        else if (v instanceof Number || v instanceof Boolean) b.append(v);
        else if (v instanceof Map) {
            b.append('{'); boolean first = true;
            for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
                if (!first) b.append(',');
                first = false; quote(b, String.valueOf(e.getKey())); b.append(':'); write(b, e.getValue());
            }
            b.append('}');
        } else if (v instanceof Iterable) {
            b.append('['); boolean first = true;
            for (Object o : (Iterable<?>) v) { if (!first) b.append(','); first = false; write(b, o); }
            b.append(']');
        } else if (v instanceof Object[]) {
            write(b, java.util.Arrays.asList((Object[]) v));
        } else quote(b, v.toString());
    }

    private static void quote(StringBuilder b, String s) {
        b.append('"');
        for (int k = 0; k < s.length(); k++) {
            char c = s.charAt(k);
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c)); else b.append(c);
            }
        }
        b.append('"');
    }
}
