package demo;

import funcatron.Request;
import funcatron.Response;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * A Java Func: each operationId names `package.Class::method` (or
 * `package.Class`, method `handle`). Methods take a funcatron.Request and
 * return a String (text), byte[] (binary), Map/List (JSON), null (204) or a
 * funcatron.Response. One instance serves every call of its worker.
 */
public class Api {
    private final String greeting = System.getenv().getOrDefault("GREETING", "Hi");

    public Object hello(Request req) {
        String times = req.query("times");
        int n = times == null ? 1 : Integer.parseInt(times);
        String one = greeting + ", " + req.params.get("name") + "!";
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("greeting", String.join(" ", java.util.Collections.nCopies(n, one)));
        out.put("runtime", "java");
        out.put("trace", req.header("x-trace"));
        return out;
    }

    public Object echo(Request req) {
        String type = req.header("content-type");
        return new Response(200, req.body())
            .header("content-type", type == null ? "application/octet-stream" : type)
            .header("x-echo-length", Integer.toString(req.body().length));
    }

    @SuppressWarnings("unchecked")
    public Object createItem(Request req) {
        Map<String, Object> item = (Map<String, Object>) req.json();
        long qty = (Long) item.get("qty");
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("name", item.get("name"));
        out.put("qty", qty);
        out.put("total", qty * 2);
        return new Response(201, out);
    }

    public Object headers(Request req) {
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("headers", req.headers);
        out.put("method", req.method);
        out.put("path", req.path);
        out.put("id", req.id);
        return out;
    }

    public Object status(Request req) {
        int code = Integer.parseInt(req.params.get("code"));
        return new Response(code, "status " + code);
    }

    public static Object env(Request req) {
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("GREETING", System.getenv("GREETING"));
        out.put("API_TOKEN", System.getenv("API_TOKEN"));
        out.put("HOME", System.getenv("HOME"));
        return out;
    }

    public Object sleep(Request req) throws InterruptedException {
        Thread.sleep(Long.parseLong(req.query("ms")));
        return "slept";
    }

    public Object crash(Request req) {
        Runtime.getRuntime().halt(3);
        return null;
    }

    public Object fail(Request req) {
        throw new IllegalStateException("this Func always fails");
    }

    public Object noisy(Request req) {
        System.out.print("\u0000\u0001garbage on stdout that is not a frame\n");
        System.out.flush();
        System.err.println("a line on stderr for " + req.id);
        return "still fine";
    }
}
